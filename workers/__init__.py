"""The Ray worker actor: device, process group, model shard, model runner, sampler."""
