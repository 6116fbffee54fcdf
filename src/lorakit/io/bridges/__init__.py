"""Format bridges: a PEFT-format adapter to and from the files other LoRA consumers read.

Every bridge goes through :class:`~lorakit.io.bridges.common.PeftAdapter` (an ``adapter_config.json``
dict and its tensors under PEFT's keys), so each is one function each way:

=============  ===================================  ====================================
consumer       write                                read
=============  ===================================  ====================================
llama.cpp      :func:`gguf.write_gguf`              :func:`gguf.read_gguf`
diffusers      :func:`kohya.write_diffusers`        :func:`kohya.read_diffusers`
kohya          :func:`kohya.write_kohya`            :func:`kohya.read_kohya`
MLX (mlx-lm)   :func:`mlx.write_mlx`                :func:`mlx.read_mlx`
=============  ===================================  ====================================

Before writing, each writer checks the adapter against its consumer's rule table
(:mod:`lorakit.io.consumers`, the table ``lorakit inspect`` prints) and refuses, writing nothing.
The modules import torch and safetensors only; ``gguf``, ``diffusers`` and ``mlx`` are imported
when a bridge that needs them runs.
"""
