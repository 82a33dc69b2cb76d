from lightning_moe.routers.base import Router


class GShardRouter(Router):
    pass
