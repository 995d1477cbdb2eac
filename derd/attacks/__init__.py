"""L-inf attacks on [0,1] images: one short module each on :class:`~derd.attacks.base.Attack`."""
from derd.attacks.base import ATTACKS, Attack, eval_mode, project, robust_flags
from derd.attacks.cw import CW, margin_loss
from derd.attacks.fgsm import FGSM
from derd.attacks.pgd import KLPGD, PGD

__all__ = ["ATTACKS", "CW", "FGSM", "KLPGD", "PGD", "Attack", "eval_mode", "margin_loss", "project", "robust_flags"]
