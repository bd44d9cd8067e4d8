"""Policy backends (see `treegrpo.protocols.Policy`)."""

from treegrpo.policies.hf import HFPolicy, PrefixCache, load_hf_policy

__all__ = ["HFPolicy", "PrefixCache", "load_hf_policy"]
