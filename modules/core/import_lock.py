"""One lock for the first imports of transformers and diffusers: their lazy modules are not safe to import from
two threads at once (one thread sees a half-initialised module: "cannot import name 'CLIPImageProcessor'").
The warm-up job and the UI's token counter both import them; each holds this lock while it does."""
import threading

lock = threading.RLock()
