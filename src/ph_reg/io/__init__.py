"""Files on disk: atomic writes and safetensors files (:mod:`ph_reg.io.files`), resumable sharded stores
(:mod:`ph_reg.io.shards`)."""
