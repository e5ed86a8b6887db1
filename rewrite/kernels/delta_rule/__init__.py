"""Delta rule / Gated DeltaNet (chunked WY form, GQA, varlen, states) and its recurrent decode step."""

from .api import delta_rule, delta_rule_step

__all__ = ["delta_rule", "delta_rule_step"]
