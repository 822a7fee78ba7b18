class EmbeddingCache:  # placeholder
    pass


class CachedEmbedder:  # placeholder
    pass


class EmbedStats:  # placeholder
    pass
