from lightning_moe.routers.base import Router


class NoisyTopKRouter(Router):
    pass
