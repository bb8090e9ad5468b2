"""Getting models and text in and out: local directories, GGUF files, the hub, safetensors."""
