"""Generation: txt2img, img2img and inpainting, from a request to images, infotexts and saved files. The request
side (`params`, `img2img_params`: dataclasses, limits, validation) is torch-free and imported by the UI and the
API at start-up; the work (`processing`, `txt2img`, `img2img`, `hires`, `images`, `outpainting`) imports torch."""
