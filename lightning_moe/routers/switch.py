from lightning_moe.routers.base import Router


class SwitchRouter(Router):
    pass
