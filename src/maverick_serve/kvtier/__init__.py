"""The KV-cache tier: Llama 4-aware KV blocks in a shared store (embedded memory or Redis), so a
prompt is prefilled once and reused by any replica."""
