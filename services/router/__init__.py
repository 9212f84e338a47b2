"""Router service: node-limited dispatch of tokens to expert shards and combine of their results."""
