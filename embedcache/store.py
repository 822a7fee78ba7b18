class VectorStore:  # placeholder
    pass
