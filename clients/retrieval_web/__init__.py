"""A web page for the retrieval service: search by image, label the suggested items, review kNN
proposals, see the corpus and its near duplicates. It is a client of the gRPC service (through
retrieval_client), run as its own process: `retrieval-web --address HOST:PORT --image-root DIR`."""
