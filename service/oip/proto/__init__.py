"""The Open Inference Protocol's gRPC messages and service stubs, generated from ``open_inference.proto`` (by
``scripts/generate_oip_stubs.py``, committed) into a descriptor pool of their own, so that another copy of the
protocol in the same process (tritonclient's, say) does not collide with them."""

from google.protobuf import descriptor_pool

POOL = descriptor_pool.DescriptorPool()
