"""cxr-node: a PACS companion daemon that triages chest X-rays.

Importing this package is cheap: nothing heavy (torch, pynetdicom, SQLAlchemy engines) is
imported or built here.
"""

__version__ = "0.1.0"
