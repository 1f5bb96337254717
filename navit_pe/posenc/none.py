"""`none`: no positional information at all; the model sees a bag of patches."""
from .base import PosEncoding


class NoPosEncoding(PosEncoding):
    name = "none"
    cls_handling = "nothing to handle: no token gets a position"
    same_in_both_modes = True
