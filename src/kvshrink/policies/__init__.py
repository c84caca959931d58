"""Policies: how much to keep (bits per layer, level per token)."""
