def main():  # placeholder
    raise NotImplementedError
