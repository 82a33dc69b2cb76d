from lightning_moe.routers.base import Router


class ExpertChoiceRouter(Router):
    pass
