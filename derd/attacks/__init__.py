"""L-inf attacks on [0,1] images: one short module each on :class:`~derd.attacks.base.Attack`."""
from .base import Attack, eval_mode, project, robust_flags
from .cw import CW, margin_loss
from .fgsm import FGSM
from .pgd import PGD, KLPGD

__all__ = ["Attack", "eval_mode", "project", "PGD", "KLPGD", "FGSM", "CW", "margin_loss", "robust_flags"]
