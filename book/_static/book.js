// Every code cell gets a "hide code" button that folds its source away (outputs stay), and back.
document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll("div.cell > div.cell_input").forEach((input) => {
    const button = document.createElement("button");
    button.className = "cell-toggle";
    button.type = "button";
    button.textContent = "hide code";
    button.addEventListener("click", () => {
      const folded = input.classList.toggle("folded");
      button.textContent = folded ? "show code" : "hide code";
    });
    input.parentElement.insertBefore(button, input);
  });
});
