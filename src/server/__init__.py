"""The server: aggregation of uploads, the global similarity S_g, its graph communities, the broadcast."""
