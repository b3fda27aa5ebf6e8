// Answers as Markdown: marked parses (GitHub-flavoured), highlight.js colours code blocks, DOMPurify keeps only
// the tags Markdown makes. The text comes from a model, so nothing it writes may run script or load anything:
// images and media are dropped (the page talks to its node only), links open in a new tab without a referrer.
// Parsing the whole text again at every token is what makes a half-streamed answer (an open code fence, an
// unfinished table) render as far as it goes.

import DOMPurify from 'dompurify';
import hljs from 'highlight.js/lib/core';
import bash from 'highlight.js/lib/languages/bash';
import c from 'highlight.js/lib/languages/c';
import cpp from 'highlight.js/lib/languages/cpp';
import css from 'highlight.js/lib/languages/css';
import go from 'highlight.js/lib/languages/go';
import java from 'highlight.js/lib/languages/java';
import javascript from 'highlight.js/lib/languages/javascript';
import json from 'highlight.js/lib/languages/json';
import python from 'highlight.js/lib/languages/python';
import rust from 'highlight.js/lib/languages/rust';
import shell from 'highlight.js/lib/languages/shell';
import sql from 'highlight.js/lib/languages/sql';
import typescript from 'highlight.js/lib/languages/typescript';
import xml from 'highlight.js/lib/languages/xml';
import yaml from 'highlight.js/lib/languages/yaml';
import { Marked } from 'marked';
import { markedHighlight } from 'marked-highlight';
import 'highlight.js/styles/github-dark.css';

const LANGUAGES = { bash, c, cpp, css, go, java, javascript, json, python, rust, shell, sql, typescript, xml, yaml };
for (const [name, language] of Object.entries(LANGUAGES)) hljs.registerLanguage(name, language);

const marked = new Marked(
	{ gfm: true, breaks: true, async: false },
	markedHighlight({
		langPrefix: 'hljs language-',
		highlight(code, lang) {
			const language = hljs.getLanguage(lang) ? lang : null;
			// no fence language: guess among the registered ones (a model often leaves it out)
			return language ? hljs.highlight(code, { language }).value : hljs.highlightAuto(code).value;
		}
	})
);

const ALLOWED_TAGS = [
	'p', 'br', 'hr', 'h1', 'h2', 'h3', 'h4', 'h5', 'h6', 'strong', 'em', 'del', 's', 'code', 'pre', 'blockquote',
	'ul', 'ol', 'li', 'a', 'table', 'thead', 'tbody', 'tr', 'th', 'td', 'span', 'sup', 'sub', 'kbd'
];
const ALLOWED_ATTR = ['href', 'title', 'class', 'start', 'align'];

const purify = DOMPurify(window);
purify.addHook('afterSanitizeAttributes', (node) => {
	if (node.tagName === 'A') {
		node.setAttribute('target', '_blank');
		node.setAttribute('rel', 'noopener noreferrer');
	}
});

/** Markdown text as sanitised HTML, safe for `{@html}`. */
export function renderMarkdown(text: string): string {
	const html = marked.parse(text) as string;
	return purify.sanitize(html, { ALLOWED_TAGS, ALLOWED_ATTR, ALLOW_DATA_ATTR: false });
}
