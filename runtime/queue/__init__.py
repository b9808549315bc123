"""Messages, codecs, the driver interface, and consumers with their worker pools."""
