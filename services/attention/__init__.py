"""Attention service: data-parallel actors owning sequences, their latent KV cache and MLA."""
