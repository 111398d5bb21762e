"""Interop: Hugging Face import/export with verified parity, dense-to-MoE upcycling, GGUF export."""
