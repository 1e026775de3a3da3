"""The HTTP transport (aiohttp), as a package.

``app`` (HttpServer: routes, file serving, lifecycle), ``nodes`` (the node and
operator routes), ``send`` (the one send path and abort path, refusals) and
``chunkfast`` (plain chunk GETs answered before aiohttp parses them).  The
open-file cache, ranges, ETags and header blocks are in ``bootd.net.files``,
shared with TFTP.
"""
