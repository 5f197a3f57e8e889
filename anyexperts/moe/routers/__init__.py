"""Routing methods of the AnyExperts layer besides its own (anyexperts/moe/router.py): each one
module returning the same `Routing`, so the layer does not branch on the method.

    base.py    SlotRouter: routers that pick real experts from E logits alone
    budget.py  RealExpertsController: a router setting steered to a mean real-expert count
    topp.py    TopPRouter: top-p routing with a threshold controller
    relu.py    ReLURouter: ReMoE's ReLU gates with an adaptive L1 coefficient
"""

from anyexperts.moe.routers.base import SlotRouter
from anyexperts.moe.routers.budget import RealExpertsController, update_count_controllers
from anyexperts.moe.routers.relu import ReLURouter
from anyexperts.moe.routers.topp import TopPRouter

__all__ = ["SlotRouter", "RealExpertsController", "update_count_controllers", "ReLURouter", "TopPRouter"]
