"""Checkpoints of other frameworks in and out of mmjax (Hugging Face BERT: `hf`; open_clip).

Converters check names and shapes and fail loudly; they need the interop extra (safetensors;
torch and transformers for the parity tests and for reading .bin files).
"""
