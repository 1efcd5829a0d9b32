package static

import (
	"errors"
	"fmt"
	"strconv"
	"strings"

	"gopkg.in/yaml.v3"
)

// object is one Kubernetes object of the file: its YAML node, where it is, and what it is, so that
// every error can say so.
type object struct {
	file       string
	doc        int // 1-based document index
	item       int // 1-based index in a List's items, 0 outside a List
	node       *yaml.Node
	apiVersion string
	kind       string
	namespace  string // "default" for namespaced kinds that give none
	name       string
}

// identify reads apiVersion, kind and metadata straight from the node. defaultKind is the kind of
// the items of a typed list (ServiceList), whose items the API server sends without one.
func (o *object) identify(defaultKind, defaultAPIVersion string) {
	o.kind = scalar(mapValue(o.node, "kind"))
	if o.kind == "" {
		o.kind = defaultKind
	}
	o.apiVersion = scalar(mapValue(o.node, "apiVersion"))
	if o.apiVersion == "" {
		o.apiVersion = defaultAPIVersion
	}
	meta := resolve(mapValue(o.node, "metadata"))
	o.name = scalar(mapValue(meta, "name"))
	if o.kind != "Node" && !isList(o.kind) {
		o.namespace = scalar(mapValue(meta, "namespace"))
		if o.namespace == "" {
			o.namespace = "default"
		}
	}
}

// shortWhere locates the object inside its file: "document 2" or "document 1, item 3".
func (o *object) shortWhere() string {
	if o.item > 0 {
		return fmt.Sprintf("document %d, item %d", o.doc, o.item)
	}
	return fmt.Sprintf("document %d", o.doc)
}

// where is the prefix of every error about the object:
// "file: document 3 (Service default/web)".
func (o *object) where() string {
	var b strings.Builder
	b.WriteString(o.file)
	b.WriteString(": ")
	b.WriteString(o.shortWhere())
	if o.kind != "" {
		b.WriteString(" (")
		b.WriteString(o.kind)
		switch {
		case o.name != "" && o.namespace != "":
			b.WriteString(" " + o.namespace + "/" + o.name)
		case o.name != "":
			b.WriteString(" " + o.name)
		}
		b.WriteString(")")
	}
	return b.String()
}

// errf returns an error about the field at p (nil for the object itself), with the line of the
// deepest node of p that exists.
func (o *object) errf(p []any, format string, args ...any) error {
	err := fmt.Errorf(format, args...)
	line := lineOf(o.node, p)
	if len(p) == 0 {
		return fmt.Errorf("%s, line %d: %w", o.where(), line, err)
	}
	return fmt.Errorf("%s, line %d: %s: %w", o.where(), line, fieldPath(p), err)
}

// decode decodes the object's node into v, turning yaml.v3's type errors into one line.
func (o *object) decode(v any) error {
	err := o.node.Decode(v)
	if err == nil {
		return nil
	}
	if te, ok := errors.AsType[*yaml.TypeError](err); ok {
		return fmt.Errorf("%s: %s", o.where(), strings.Join(te.Errors, "; "))
	}
	return fmt.Errorf("%s: %w", o.where(), err)
}

// checkNames checks that a Service's name and namespace can be DNS labels.
func (o *object) checkNames() error {
	if !isDNSLabel(o.name) {
		return o.errf(path("metadata", "name"), "%q is not a valid name (lowercase letters, digits and '-', at most 63)", o.name)
	}
	return o.checkNamespace()
}

func (o *object) checkNamespace() error {
	if !isDNSLabel(o.namespace) {
		return o.errf(path("metadata", "namespace"), "%q is not a valid namespace (lowercase letters, digits and '-', at most 63)", o.namespace)
	}
	return nil
}

// path builds a field path of mapping keys (string, or mapKey for a key written in brackets) and
// sequence indices (int).
func path(segs ...any) []any { return segs }

// mapKey is a field path segment for a key of a free-form map, such as an annotation, which
// fieldPath writes in brackets: metadata.annotations[edgewire.io/endpoints].
type mapKey string

// fieldPath formats p the Kubernetes way: spec.ports[0].port.
func fieldPath(p []any) string {
	var b strings.Builder
	for _, seg := range p {
		switch s := seg.(type) {
		case int:
			b.WriteString("[" + strconv.Itoa(s) + "]")
		case mapKey:
			b.WriteString("[" + string(s) + "]")
		default:
			if b.Len() > 0 {
				b.WriteByte('.')
			}
			fmt.Fprint(&b, s)
		}
	}
	return b.String()
}

// lineOf returns the line of the field at p under n (the line of its key, for a mapping value), or
// of its deepest ancestor that exists.
func lineOf(n *yaml.Node, p []any) int {
	n = resolve(n)
	line := n.Line
	for _, seg := range p {
		switch s := seg.(type) {
		case string, mapKey:
			k, v := mapEntry(n, fmt.Sprint(s))
			if k == nil {
				return line
			}
			n, line = resolve(v), k.Line
		case int:
			if n.Kind != yaml.SequenceNode || s < 0 || s >= len(n.Content) {
				return line
			}
			n = resolve(n.Content[s])
			line = n.Line
		}
		if n == nil {
			return line
		}
	}
	return line
}

// mapValue returns the value of key in mapping n, or nil.
func mapValue(n *yaml.Node, key string) *yaml.Node {
	_, v := mapEntry(n, key)
	return v
}

// mapEntry returns the key and value nodes of key in mapping n, or nils.
func mapEntry(n *yaml.Node, key string) (k, v *yaml.Node) {
	if n == nil || n.Kind != yaml.MappingNode {
		return nil, nil
	}
	for i := 0; i+1 < len(n.Content); i += 2 {
		if n.Content[i].Value == key {
			return n.Content[i], n.Content[i+1]
		}
	}
	return nil, nil
}

// resolve follows aliases.
func resolve(n *yaml.Node) *yaml.Node {
	for i := 0; n != nil && n.Kind == yaml.AliasNode && i < 100; i++ {
		n = n.Alias
	}
	return n
}

// scalar returns n's value if it is a scalar, else "".
func scalar(n *yaml.Node) string {
	n = resolve(n)
	if n == nil || n.Kind != yaml.ScalarNode || n.Tag == "!!null" {
		return ""
	}
	return n.Value
}

func nodeKind(n *yaml.Node) string {
	switch n.Kind {
	case yaml.SequenceNode:
		return "list"
	case yaml.MappingNode:
		return "mapping"
	case yaml.ScalarNode:
		return "scalar " + strconv.Quote(n.Value)
	}
	return "node"
}
