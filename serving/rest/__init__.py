"""The REST front (KServe v2 over HTTP): app (routes, handlers, its port), wire (JSON and Triton's
binary extension to neutral tensors and back), guard (tokens, sizes, status codes), connections
(the connection cap), openapi (the document it serves).
"""
