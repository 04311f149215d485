"""The client-data contract: manifest, record schema, client ids, files written atomically.

The lowest layer: pure Python (no TensorFlow), so Beam workers and silo
servers import it cheaply.
"""
