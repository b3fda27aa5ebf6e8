// One static page, rendered in the browser: it needs the live node, so there is nothing to render ahead.
export const prerender = true;
export const ssr = false;
