"""Recording under torch.distributed: DDP (rank 0 writes) and FSDP2 (every rank writes its parts)."""

from .collective import all_ok, run_agreed, share
from .ddp import gather_ids, world
from .fsdp import check_parts, is_sharded, local_range, local_tensor, plan_parts, shard_ranges

__all__ = ["gather_ids", "world", "all_ok", "run_agreed", "share", "check_parts", "is_sharded", "local_range", "local_tensor",
           "plan_parts", "shard_ranges"]
