"""The core every other layer shares and that imports none of them: devices and memory figures, the job queue,
typed settings, file writing, paths, the infotext, saving images, samplers, pixel upscalers, the command line
and the console. torch is imported only inside the functions that need it."""
