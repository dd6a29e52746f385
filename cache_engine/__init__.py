"""The worker's paged KV cache: allocation, sizing, block copy and swap."""
