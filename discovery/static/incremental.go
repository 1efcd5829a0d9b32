package static

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"

	"gopkg.in/yaml.v3"

	"github.com/edgewire/edgewire/discovery"
)

// Re-parsing only what changed. A catalog of 10,000 services is a file of tens of megabytes, and
// decoding its YAML takes seconds; a change usually touches one document. parseCached splits the
// file into its documents at their `---` lines, and for every document whose bytes are the same as
// in the last good parse it replays the objects that document produced then, instead of decoding
// it again. The result is the same as Parse's: a document's objects depend on its bytes alone, and
// everything that relates documents to each other (duplicates, slices joined to services, sorting)
// still runs over the whole file. Whenever the cached parse fails, the file is parsed again from
// scratch, so that errors are exactly Parse's.

// docCache holds the records of the documents of the last good parse, by their content hash.
type docCache struct {
	docs map[[sha256.Size]byte]*docRecord
}

// docRecord is what one document added to a parse.
type docRecord struct {
	entries []recEntry
	ignored []string // kinds of ignored objects, once per object
}

// recEntry is one object of a document: exactly one of svc, slice, node is set. The values are
// pristine copies: a replay copies them again before handing them on.
type recEntry struct {
	item  int // 1-based index in a List, 0 outside one
	svc   *discovery.Service
	slice *parsedSlice
	fqdn  bool // slice is an FQDN slice: known for duplicates, otherwise ignored
	node  *discovery.Node
}

// parseCached parses data like parse, reusing cache's records for unchanged documents; on success
// it replaces cache's content with this parse's records. cache may be empty, never nil.
func parseCached(data []byte, filename string, cache *docCache) (*result, error) {
	chunks, ok := splitDocuments(data)
	if !ok {
		return parse(data, filename)
	}
	p := newParser(filename)
	next := make(map[[sha256.Size]byte]*docRecord, len(chunks))
	doc := 0
	for _, c := range chunks {
		sum := sha256.Sum256(c.data)
		if r, ok := cache.docs[sum]; ok && c.docs == 1 {
			doc++
			if !p.replay(doc, r) {
				return parse(data, filename) // a duplicate: let the full parse name it
			}
			next[sum] = r
			continue
		}
		rec := &docRecord{}
		n, err := p.chunk(c, doc, rec)
		if err != nil {
			return parse(data, filename)
		}
		doc += n
		if n == 1 {
			next[sum] = rec
		}
	}
	cache.docs = next
	return p.finish(), nil
}

// chunk decodes the documents of one chunk (first numbered doc+1) with lines counted from the
// start of the file, and returns how many it held.
func (p *parser) chunk(c docChunk, doc int, rec *docRecord) (int, error) {
	dec := yaml.NewDecoder(bytes.NewReader(c.data))
	n := 0
	for {
		var root yaml.Node
		err := dec.Decode(&root)
		if errors.Is(err, io.EOF) {
			return n, nil
		}
		if err != nil {
			return n, fmt.Errorf("%s: document %d: %w", p.file, doc+n+1, err)
		}
		n++
		shiftLines(&root, c.line-1)
		p.rec = rec
		err = p.document(doc+n, &root)
		p.rec = nil
		if err != nil {
			return n, err
		}
	}
}

// replay adds a cached document's objects as document doc. It reports false when one of them
// collides with an object already added: the caller then parses the file from scratch.
func (p *parser) replay(doc int, r *docRecord) bool {
	for _, kind := range r.ignored {
		p.ignored[kind]++
	}
	for _, e := range r.entries {
		at := (&object{doc: doc, item: e.item}).shortWhere()
		switch {
		case e.svc != nil:
			key := e.svc.Key()
			if _, dup := p.services[key]; dup {
				return false
			}
			svc := *e.svc
			p.services[key] = &parsedService{svc: &svc, at: at}
		case e.slice != nil:
			if _, dup := p.slices[e.slice.key]; dup {
				return false
			}
			ps := &parsedSlice{key: e.slice.key, service: e.slice.service, endpoints: e.slice.endpoints, at: at}
			p.slices[ps.key] = ps
			if e.fqdn {
				p.ignored["EndpointSlice (FQDN)"]++
				continue
			}
			p.order = append(p.order, ps)
		case e.node != nil:
			if _, dup := p.nodes[e.node.Name]; dup {
				return false
			}
			n := *e.node
			pn := &parsedNode{node: &n, at: at}
			if n.WireGuardKey != "" {
				raw, _ := discovery.ParseWireGuardKey(n.WireGuardKey)
				if _, dup := p.wgKeys[raw]; dup {
					return false
				}
				p.wgKeys[raw] = pn
			}
			p.nodes[n.Name] = pn
		}
	}
	return true
}

// docChunk is a part of the file that starts at a document marker (or at the start of the file).
type docChunk struct {
	data []byte
	line int // 1-based line of its first byte in the file
	// docs is 1 when the chunk is one document for certain; chunks of only comments and blank
	// lines may hold none, and those are never cached.
	docs int
}

// splitDocuments cuts data before every line that starts a document (`---` alone or followed by a
// space or tab). It reports false for streams it does not split: ones with directives (`%YAML`,
// `%TAG`), which belong to the document after them.
func splitDocuments(data []byte) ([]docChunk, bool) {
	var chunks []docChunk
	start, startLine, line := 0, 1, 1
	for i := 0; i < len(data); {
		end := bytes.IndexByte(data[i:], '\n')
		next := len(data)
		if end >= 0 {
			next = i + end + 1
		}
		l := data[i:next]
		if len(l) > 0 && l[0] == '%' {
			return nil, false
		}
		if isDocStart(l) && i > start {
			chunks = append(chunks, docChunk{data: data[start:i], line: startLine})
			start, startLine = i, line
		}
		i = next
		line++
	}
	if start < len(data) {
		chunks = append(chunks, docChunk{data: data[start:], line: startLine})
	}
	for i := range chunks {
		if hasContent(chunks[i].data) {
			chunks[i].docs = 1
		}
	}
	return chunks, true
}

// isDocStart reports whether line (with its newline, if any) is a `---` document marker.
func isDocStart(line []byte) bool {
	if !bytes.HasPrefix(line, []byte("---")) {
		return false
	}
	rest := line[3:]
	return len(rest) == 0 || rest[0] == ' ' || rest[0] == '\t' || rest[0] == '\n' || rest[0] == '\r'
}

// hasContent reports whether a chunk has a line other than blank lines, comments and its `---`
// marker: one with something a document is made of. A marker line with content after it
// (`--- !tag`, `--- {}`) counts too, to be safe: such chunks are parsed like any other.
func hasContent(chunk []byte) bool {
	for len(chunk) > 0 {
		l := chunk
		if i := bytes.IndexByte(chunk, '\n'); i >= 0 {
			l, chunk = chunk[:i], chunk[i+1:]
		} else {
			chunk = nil
		}
		if isDocStart(l) {
			l = l[3:]
		}
		l = bytes.TrimSpace(l)
		if len(l) > 0 && l[0] != '#' && !bytes.Equal(l, []byte("...")) {
			return true
		}
	}
	return false
}

// shiftLines adds delta to the line of n and every node under it.
func shiftLines(n *yaml.Node, delta int) {
	if delta == 0 || n == nil {
		return
	}
	stack := []*yaml.Node{n}
	for len(stack) > 0 {
		n := stack[len(stack)-1]
		stack = stack[:len(stack)-1]
		n.Line += delta
		stack = append(stack, n.Content...)
	}
}
