"""Storage tiers of a cache worker (memory and disk) and their eviction policies."""
