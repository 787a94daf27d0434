"""Llama-family decoder models whose attention runs through the paged op."""
