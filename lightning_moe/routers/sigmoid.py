from lightning_moe.routers.base import Router


class SigmoidRouter(Router):
    pass
