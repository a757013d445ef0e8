"""Files: reading and writing checkpoints (safetensors and .ckpt), their metadata and hashes, save options, and the
merge history. Plain Python over torch and safetensors; knows nothing of the WebUI."""
