class OpenAIEmbeddings:  # placeholder
    def __init__(self, *a, **k):
        raise NotImplementedError
