"""The console's pages, one module per part of the console; :mod:`cxr_node.web.app` routes to them."""
