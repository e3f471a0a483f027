// Renders an Ollama Modelfile's TEMPLATE with Go's text/template, as Ollama does:
// go run render_template.go MODELFILE PROMPT_FILE  -> the rendered prompt on stdout (no response).
package main

import (
	"fmt"
	"os"
	"strings"
	"text/template"
)

func main() {
	modelfile, err := os.ReadFile(os.Args[1])
	check(err)
	prompt, err := os.ReadFile(os.Args[2])
	check(err)
	text := string(modelfile)
	start := strings.Index(text, "TEMPLATE \"\"\"")
	if start < 0 {
		check(fmt.Errorf("no TEMPLATE \"\"\" in %s", os.Args[1]))
	}
	body := text[start+len("TEMPLATE \"\"\""):]
	body = body[:strings.Index(body, "\"\"\"")]
	tmpl, err := template.New("modelfile").Parse(body)
	check(err)
	data := map[string]any{"Prompt": string(prompt), "Response": "", "System": ""}
	check(tmpl.Execute(os.Stdout, data))
}

func check(err error) {
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
