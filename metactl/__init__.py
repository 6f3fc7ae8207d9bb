"""metactl placeholder"""
