import adapter from '@sveltejs/adapter-static';
import { vitePreprocess } from '@sveltejs/vite-plugin-svelte';

/** @type {import('@sveltejs/kit').Config} */
const config = {
	preprocess: vitePreprocess(),
	kit: {
		// One static page; the node serves dashboard/build/ at `/` (ringlet/api/dashboard.py).
		adapter: adapter({ pages: 'build', assets: 'build', strict: true })
	}
};

export default config;
