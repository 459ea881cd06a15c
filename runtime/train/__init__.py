"""Training the embedded model: procedural data, the VAE/text/UNet/LCM stages, the adherence judge, the export.

See README.md beside this file. Nothing here is imported by `import diffrt`.
"""
