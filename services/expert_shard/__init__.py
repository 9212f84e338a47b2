"""Expert-shard service: one actor per device slot hosting physical experts; one per node forwards."""
