"""hf_transfer: transfer learning recipes on the Hugging Face stack."""

from hf_transfer.errors import HfTransferError

__version__ = "0.1.0"
__all__ = ["HfTransferError", "__version__"]
