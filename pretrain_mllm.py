"""Train a Llama-3.2-Vision-style model with context-parallel cross-attention (LV-XAttn).

    python -m lvx_megatron.torchrun --nproc-per-node=2 pretrain_mllm.py --config examples/configs/tiny.yaml

(``lvx_megatron.torchrun`` is torchrun that ends a failed run with the ranks' one-line errors;
plain ``torchrun`` works too.)

Flags are Megatron-LM's (see ``--help``) and override the YAML config; see README.md.
"""

import logging
import warnings

# Import-time notices of optional fused kernels (Transformer Engine, apex) and CUDA probing.
warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")
warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
logging.getLogger("megatron").setLevel(logging.WARNING)
# Deprecation notices about megatron-core internals (DDP layout pre-computation, async-save
# backend) that ask nothing of the user.
for name in (
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.dist_checkpointing.strategies.torch",
):
    logging.getLogger(name).setLevel(logging.ERROR)

from lvx_megatron.training import main  # noqa: E402

if __name__ == "__main__":
    main()
