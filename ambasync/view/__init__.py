"""``ambasync view``: a local web page on the cube (see docs/view.md).

- :mod:`ambasync.view.app`: the aiohttp app (routes, safety, search jobs);
- :mod:`ambasync.view.data`: what the page needs from the cube (catalogue, slices, voxels, maps);
- :mod:`ambasync.view.coexpression`: correlation of every voxel with a seed voxel, in memory;
- ``static/``: the page (hand-written HTML, JavaScript and CSS, served by the app itself).
"""
